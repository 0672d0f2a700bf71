"""Reversible blocks under 2-process CPU DDP (gloo) in a real ``Trainer.fit``.

DDP hooks into ``.grad`` accumulation: the reversible backward delivers every block
parameter's gradient from one autograd node, after which DDP's all-reduce must still average
them. Both ranks must end with identical weights, equal to one process doing the same SGD
steps on the union of the two ranks' batches (equal shards: the mean of the two losses).
"""

from __future__ import annotations

import os
import socket

import pytest
import tiny_models as tm
import torch

STEPS, BATCH, LR = 3, 4, 0.05


def _module():
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = tm.timm_vit(depth=2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Module()


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = 2 * BATCH * STEPS
    return torch.utils.data.TensorDataset(
        torch.randn(n, 3, tm.IMG, tm.IMG, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from vleff.callbacks import Reversible

    class SaveStart(pl.Callback):
        """The weights training starts from (MEFT's adapters are drawn in ``setup``; DDP then
        broadcasts rank 0's)."""

        def on_train_start(self, trainer, pl_module):
            torch.save(
                {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                os.path.join(out_dir, f"start{rank}.pt"),
            )

    module = _module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[Reversible(coupling="meft", lam=0.7, beta=0.9), SaveStart()],
    )
    # rank r: samples r, r + 2, ... (Lightning's own sampler would shuffle)
    sampler = torch.utils.data.DistributedSampler(_data(), num_replicas=world, rank=rank, shuffle=False)
    trainer.fit(module, torch.utils.data.DataLoader(_data(), batch_size=BATCH, sampler=sampler))
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    # tear the gloo group down before the interpreter exits: left to exit, gloo's threads can abort
    # ("terminate called without an active exception"), failing a run whose results were all saved
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One process: the same network from the same weights, SGD on both ranks' batches at once
    (rank r holds samples r, r+2, ...; step k of both ranks together is samples 8k ... 8k+7)."""
    from vleff.memory.reversible import apply_reversible

    module = _module()
    apply_reversible(module, coupling="meft", lam=0.7, beta=0.9)
    module.load_state_dict(start)
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    x, y = _data().tensors
    for k in range(STEPS):
        rows = slice(2 * BATCH * k, 2 * BATCH * (k + 1))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module.net(x[rows]), y[rows]).backward()
        opt.step()
    return module.state_dict()


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_each_other_and_one_process_on_the_union(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    start = torch.load(tmp_path / "start0.pt", weights_only=True)
    ref = _reference(start)
    assert set(r0) == set(r1) == set(ref) and any("vleff_reversible" in k for k in ref)  # adapters trained too
    assert all(not torch.equal(ref[k], start[k]) for k in start if "vleff_reversible.f.up" in k)
    for k in ref:
        torch.testing.assert_close(r0[k], r1[k], atol=0, rtol=0, msg=k)
        torch.testing.assert_close(r0[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
