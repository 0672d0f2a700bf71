"""LST's ladder order on the digits recipe of ``side_digits.py``: the reference's order (merge
block i's output, then side block i; the default) against ``add_residual_after=True``.

    python benchmarks/side_lst_order.py [--epochs 15] [--ft-epochs 4]

One upright pretraining, then LST r=8 on 90°-rotated digits twice from the same weights and
seeds; prints top-1, validation loss, the learned gates and the share of validation predictions
that differ between the two orders (issue 23, point 12; docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from side_digits import _quiet, fit, new_classifier, rotated_digits


def main(argv: list[str] | None = None) -> dict[bool, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ft-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from vleff.callbacks import LadderSideTuning
    from vleff.data import DigitsDataModule

    upright = DigitsDataModule(image_size=32, batch_size=64, seed=args.seed)
    shifted = rotated_digits(args.seed)
    shifted.setup("fit")
    val = list(shifted.val_dataloader())
    pl.seed_everything(args.seed, verbose=False)
    base = new_classifier(args.lr)
    fit(base, upright, args.epochs, [], "pretrain", None)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    predictions, accuracies = {}, {}
    for after in (False, True):
        pl.seed_everything(args.seed, verbose=False)
        module = new_classifier(args.lr, weights)
        pl.seed_everything(args.seed + 1, verbose=False)
        fit(module, shifted, args.ft_epochs, [LadderSideTuning(reduction=8, add_residual_after=after)], "lst", None)
        module.eval()
        loss, correct, preds = 0.0, 0, []
        with torch.no_grad():
            for x, y in val:
                logits = module(x)
                loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                preds.append(logits.argmax(-1))
        n = sum(len(y) for _, y in val)
        predictions[after], accuracies[after] = torch.cat(preds), correct / n
        gates = [round(g, 3) for g in torch.sigmoid(module.model.vleff_lst.gates / 0.1).tolist()]
        print(
            f"LST r=8 add_residual_after={after}: top-1 rotated {100 * correct / n:.2f} %, val loss {loss / n:.4f}, "
            f"gates {gates}",
            flush=True,
        )
    differ = (predictions[False] != predictions[True]).float().mean().item()
    print(f"validation predictions that differ between the orders: {100 * differ:.1f} %")
    return accuracies


if __name__ == "__main__":
    main()
