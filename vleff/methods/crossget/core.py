"""CrossGET (Shi et al., ICML 2024): cross-guided ensemble of tokens, in both towers of a pair.

>>> vleff.apply_crossget(clip, r_image=16, r_text=6)   # open_clip CLIP, HF CLIPModel, BLIP retrieval
>>> vleff.update(clip, "crossget", r_image=8)
>>> vleff.remove_crossget(clip)                          # the library's forward, exactly

Per tower and per block (between the attention and the MLP, like ToMe):

* **Cross token.** One extra token per tower, started from the cls token's input (image) or
  the EOT's (text; BLIP text: its [CLS]) and, before block ``i``, overwritten with
  ``x_cross.detach() + offset[i]``, where ``x_cross`` is the cross token as it left block
  ``i − 1`` (image) or the EOT's current state (text; BLIP: the [CLS]'s), as the reference's
  ``Transformer.forward`` does: the image guidance follows the image. The offsets are a
  learnable ``zeros(L, D)`` per tower (parameter ``vleff_crossget_offsets`` on the tower), so
  the token starts as a copy. In vleff
  the cross token *reads* the sequence but no other token attends to it (a key mask), so
  ``r_image = r_text = 0`` is exactly the library and the pretrained function is changed
  only by the merging itself. (In a causal text tower the reference's token, appended last,
  is invisible to the others too; vleff extends that to every tower.)
* **Importance** of a token: cosine of its key with the cross token's query (image) or the
  EOT query (text; BLIP: its pooled [CLS]). ``metric="full"`` (default, the reference's):
  keys and queries of all heads concatenated (the attention's full-width ``k`` and ``q``);
  ``metric="head_mean"``: averaged over heads (vleff's earlier metric, kept as an option).
* **Complete-graph soft matching** on the same keys (:mod:`vleff.kernels.graph_merge`): tokens
  ranked by best similarity; the ``r`` tokens with the lowest ``importance −`` (best
  similarity towards a token ranked after them) merge into their most similar non-source
  token. Protected: cls, the cross token, a text tower's first token (SOT/[CLS]) and its
  EOT; text padding merges only with padding.
* **Ensemble merge** (``ensemble="reference"``, default): each source and its destination are
  weighted by the softmax of their two importances (temperature 1) and combined with sizes as
  the reference does (:meth:`~vleff.kernels.graph_merge.GraphMergePlan.merge_ensemble`);
  ``ensemble="mean"``: the group's mean weighted by ``size · exp(importance)`` (a normalised
  weighted mean: non-negative coefficients summing to 1 with several sources or unequal
  sizes, where the reference's need not). Sizes add, and proportional attention adds ``log size``.
* ``r`` is per tower and constant over blocks, capped per block at ``(N − protected) // 2``
  (the reference's cap; ViT-B/16 at ``r_image=16``: 198 → 182 → … → 12 tokens).

Text towers keep their token ids' meaning through the tower's layout fields
(:mod:`vleff.backbones.text`): positions, the protected EOT and the source map merge with the
tokens, so the EOT is found and pooled as without CrossGET. Causal text towers: CLIP's, a causal
encoder pooled at its EOT, is merged (only the pooled EOT is its result); a causal *decoder* is
never merged -- the pairs CrossGET accepts have none (BLIP captioning/VQA are refused), and a
text tower that runs as one is refused at run time (a merge decided on the whole sequence would
let earlier positions' outputs depend on later tokens).

**Alignment loss.** In training (module in train mode, gradients on) each tower keeps its cross
token as it *enters* every block (``x_cross.detach() + offset[i]``: the loss trains the offsets
only, never the backbone), projected as the reference does with detached weights: image towers
with the tower's *input* norm (open_clip ``ln_pre``, HF CLIP ``pre_layrnorm``; BLIP has none and
uses its final norm) and the image projection, text towers with the final norm and the text
projection. When both towers of the pair have run, the Jensen–Shannon
divergence between the softmaxes of paired layers (image sample ``i`` with text sample ``i``)
is added, times ``loss_weight``, to the aux losses of the tower that ran second
(``crossget_js``; :mod:`vleff.tokens.aux` collects it: the callback adds it to the loss, a
mixin user adds ``self.vleff_aux_loss()``). The reference trains ``0.5·contrastive + 0.5·JS``;
``loss_weight=1`` is that up to a factor 2 on the whole loss. (The reference's ``F.kl_div`` terms
compute ``½[KL(m‖p) + KL(m‖q)]``, not the JS divergence ``½[KL(p‖m) + KL(q‖m)]`` its paper names;
vleff keeps the true JS: ``benchmarks/crossget_fidelity.py`` prints both.) Nothing crosses between the
towers at inference: each tower's output depends on its own input only, so image and text
embeddings can be computed and cached separately.

**Towers of unequal depth** (:func:`layer_pairs`): each block ``j`` of the shallower tower
(depth ``Ls``) is paired with block ``⌈(j + 1)·Ld / Ls⌉ − 1`` of the deeper one (depth
``Ld``): pairs at the same relative depth, last with last; ``Ls`` pairs enter the loss. With
equal depths this is block ``i`` with block ``i``, as in the reference.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import (
    BlockInfo,
    TokenState,
    TowerAdapter,
    TowerHook,
    find_towers,
    get_patch,
)
from vleff.backbones.pairs import (
    PAIRS_SUPPORTED,
    ModelPair,
    Pairing,
    pair_context,
    pair_or_hold,
    pairs_in,
)
from vleff.backbones.patch import check_attachable
from vleff.backbones.text import (
    PAD,
    POSITION,
    PROTECTED,
    SOURCE,
    eot_rows,
    refuse_causal_decoder,
)
from vleff.checks import check_bool, check_choice, check_int, check_number
from vleff.kernels.graph_merge import (
    complete_graph_matching,
    ensemble_weights,
    feasible_sources,
    max_graph_merge,
)
from vleff.registry import MethodConfig, get_method
from vleff.tokens.common import attach_hooks, hooks_named, remove_hooks
from vleff.tokens.merging import spread_merges

HOOK_NAME = "crossget"
OFFSETS = "vleff_crossget_offsets"
LOSS_NAME = "crossget_js"
TOWERS = ("image", "text")
SCRATCH = "crossget"
#: ``metric``: full-width keys/queries (the reference's) or their mean over heads
METRICS = ("full", "head_mean")
#: ``ensemble``: the reference's pairwise softmax merge, or a size-normalised weighted mean
ENSEMBLES = ("reference", "mean")


@dataclass
class CrossGETConfig(MethodConfig):
    """CrossGET's settings.

    Attributes:
        r_image: tokens merged per block of the image tower (capped per block): an int for every
            block (the reference's form), or a list with one entry per block (a shorter list
            leaves the remaining blocks unmerged; :func:`vleff.fit_budget` sets lists).
        r_text: the same for the text tower.
        prop_attn: proportional attention (``+log size`` on the attention logits).
        loss_weight: weight of the cross-token JS alignment loss added in training (0: off).
        trace_source: keep the source map (which input tokens each token holds) as the token
            field ``"source"`` (as ToMe's), for pictures of the merge groups; costs ``B·N²`` memory.
        metric: ``"full"`` (the reference's: keys and queries of all heads concatenated) or
            ``"head_mean"`` (averaged over heads) for the similarity graph and the importance.
        ensemble: ``"reference"`` (the reference's pairwise softmax merge) or ``"mean"`` (the
            group's mean weighted by ``size · exp(importance)``).
    """

    method = "crossget"
    r_image: int | list[int] = 16
    r_text: int | list[int] = 6
    prop_attn: bool = True
    loss_weight: float = 1.0
    trace_source: bool = False
    metric: str = "full"
    ensemble: str = "reference"

    def __post_init__(self) -> None:
        check_bool("trace_source", self.trace_source)
        check_choice("metric", self.metric, METRICS)
        check_choice("ensemble", self.ensemble, ENSEMBLES)
        self.r_image = check_r_spec("r_image", self.r_image)
        self.r_text = check_r_spec("r_text", self.r_text)
        check_bool("prop_attn", self.prop_attn)
        self.loss_weight = check_number("loss_weight", self.loss_weight, low=0.0)


def check_r_spec(name: str, value: object) -> int | list[int]:
    """``r_image``/``r_text``: an int >= 0, or a list of them (plain ints: it pickles into checkpoints)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [check_int(f"{name}[{i}]", v, low=0) for i, v in enumerate(value)]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return check_int(name, value, low=0)
    raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= 0 or a list of them (one per block)")


def r_per_block(spec: int | list[int], depth: int) -> list[int]:
    """One ``r`` per block of a tower of ``depth`` blocks (a list longer than that is refused at apply)."""
    return [spec] * depth if isinstance(spec, int) else [*spec, *([0] * (depth - len(spec)))][:depth]


# --- layer mapping and the loss -------------------------------------------------------------------------
def layer_pairs(depth_image: int, depth_text: int) -> list[tuple[int, int]]:
    """``(image block, text block)`` pairs whose cross tokens the loss aligns (module docstring)."""
    if depth_image <= 0 or depth_text <= 0:
        raise ValueError(f"tower depths must be positive, got {depth_image} and {depth_text}")
    shallow, deep = min(depth_image, depth_text), max(depth_image, depth_text)
    mapped = [math.ceil((j + 1) * deep / shallow) - 1 for j in range(shallow)]
    if depth_image <= depth_text:
        return list(zip(range(shallow), mapped))
    return list(zip(mapped, range(shallow)))


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence between ``softmax(a)`` and ``softmax(b)`` over the last dim:
    ``½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = (p + q) / 2``; shape ``a.shape[:-1]``."""
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    la, lb = a.to(wide).log_softmax(dim=-1), b.to(wide).log_softmax(dim=-1)
    lm = torch.logaddexp(la, lb) - math.log(2.0)
    return 0.5 * ((la.exp() * (la - lm)).sum(dim=-1) + (lb.exp() * (lb - lm)).sum(dim=-1))


def alignment_loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean JS divergence between per-layer projected cross tokens ``[B, Li, D]`` and ``[B, Lt, D]``
    over the :func:`layer_pairs` of the two depths and the batch."""
    if image.shape[0] != text.shape[0]:
        raise ValueError(
            f"CrossGET's alignment loss pairs image i with text i of a training step, but the image "
            f"tower ran on {image.shape[0]} samples and the text tower on {text.shape[0]}; run both "
            "towers on matching batches, or set loss_weight=0"
        )
    if image.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"CrossGET: the projected cross tokens have widths {image.shape[-1]} (image) and "
            f"{text.shape[-1]} (text); the towers' projections must share the embedding width"
        )
    pairs = layer_pairs(image.shape[1], text.shape[1])
    ii = torch.tensor([p[0] for p in pairs], device=image.device)
    tt = torch.tensor([p[1] for p in pairs], device=text.device)
    return js_divergence(image.index_select(1, ii), text.index_select(1, tt)).mean()


class Projector:
    """A tower's final norm and projection with detached weights (the loss trains the cross
    tokens, not the projections). Holds (module, attribute) pairs, read at call time."""

    def __init__(self, norm: tuple[nn.Module, str] | None, proj: tuple[nn.Module, str] | None) -> None:
        self.norm, self.proj = norm, proj

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            ln = getattr(*self.norm)
            if not isinstance(ln, nn.LayerNorm):
                raise TypeError(f"CrossGET: the tower's final norm is {type(ln).__name__}, not a LayerNorm")
            w = None if ln.weight is None else ln.weight.detach()
            b = None if ln.bias is None else ln.bias.detach()
            x = F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)
        if self.proj is not None:
            p = getattr(*self.proj)
            if isinstance(p, nn.Linear):
                x = F.linear(x, p.weight.detach(), None if p.bias is None else p.bias.detach())
            elif isinstance(p, torch.Tensor):
                x = x @ p.detach().to(x.dtype)
            elif p is not None:
                raise TypeError(
                    f"CrossGET: the tower's projection is {type(p).__name__}; expected a Linear or a matrix"
                )
        return x


class PendingCrossTokens:
    """Where the two towers of one model leave their projected cross tokens in a training step
    until both have run (one per applied model, shared by its two hooks). Not saved: pending
    tensors belong to the running step's graph."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] = {}  # modality -> vleff.backbones.pairs.Held

    def __getstate__(self) -> dict[str, Any]:
        return {"pending": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.pending = {}


def _hook_conflict_reason(other: str) -> str | None:
    """Why CrossGET cannot share a tower with the hook called ``other`` when that hook is no
    registered method (a user's hook, a teacher's capture): registered methods follow their
    declared rules (``METHOD.refuses``, asked by the patch before this)."""
    try:
        get_method(other)
    except ValueError:
        return f"{other} is a hook on the same blocks, and CrossGET changes the tower's token stream under it"
    return None


# --- the hook -------------------------------------------------------------------------------------------
class CrossGETHook(TowerHook):
    """CrossGET on one tower of a pair (see the module docstring)."""

    name = HOOK_NAME
    #: replays from its state (its cross token and offsets are in the block input and the model;
    #: the alignment loss pairs in the last block with the partner the forward recorded)
    replayable = True
    #: the cross tokens entering each block leave the blocks for the alignment loss
    side_outputs = True

    def __init__(
        self, tower: TowerAdapter, config: CrossGETConfig, projector: Projector, link: PendingCrossTokens
    ) -> None:
        self.root = tower.root
        self.modality = tower.modality
        self.describe = tower.describe()
        self.depth = len(tower.blocks())
        self.projector = projector
        self.link = link
        self.configure(config)

    def configure(self, config: CrossGETConfig) -> None:
        self.config = config
        self.r_per_block = r_per_block(config.r_image if self.modality == "image" else config.r_text, self.depth)

    def conflict_with(self, other: TowerHook) -> str | None:
        """CrossGET shares a tower with no hook that is not a registered method (registered
        methods: their declared rules, see :func:`vleff.registry.conflict`)."""
        return _hook_conflict_reason(other.name)

    # --- entry points --------------------------------------------------------------------------------
    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        b = x.shape[0]
        if self.config.trace_source:
            n = x.shape[1]
            state.register("source", torch.eye(n, device=x.device, dtype=torch.float32).expand(b, n, n), "sum")
        if self.modality == "image":
            row = torch.zeros(b, dtype=torch.long, device=x.device)
        else:
            row = eot_rows(state)  # CLIP: the EOT; BLIP: the pooled [CLS] (its layout's protected token)
        init = x.gather(1, row[:, None, None].expand(-1, 1, x.shape[-1])).detach()
        values = {}
        for name, f in state.fields.items():
            v = f.value.gather(1, row.reshape(b, 1, *([1] * (f.value.dim() - 2))).expand(b, 1, *f.value.shape[2:]))
            if name in (PROTECTED, SOURCE, "source"):
                v = torch.zeros_like(v)  # the reducers keep it (prefix); it holds no input position
            values[name] = v  # position: the cross token sees what its source token sees
        index = state.num_prefix
        x = state.insert_prefix(x, init, values)
        state.scratch[SCRATCH] = {
            "index": index,
            "device": x.device,
            "inputs": [],
            "record": self._recording(),
            "pairing": Pairing(),  # shared by the state's replay copies
        }
        return x

    def _recording(self) -> bool:
        return self.config.loss_weight > 0 and torch.is_grad_enabled() and self.root.training

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        """Re-inject the cross token: its own state (image; before block 0 its start value) or the
        EOT's current state (text), detached, plus this block's offset. In training that is what
        the alignment loss reads (the reference records the token entering each block)."""
        s = state.scratch[SCRATCH]
        c = s["index"]
        offsets = getattr(self.root, OFFSETS)
        row = c if self.modality == "image" else eot_rows(state)
        current = (
            x[:, c : c + 1] if self.modality == "image" else x.gather(1, row[:, None, None].expand(-1, 1, x.shape[-1]))
        )
        cross = current.detach() + offsets[info.index].to(x.dtype)
        if s["record"]:
            s["inputs"].append(cross[:, 0])
        return torch.cat([x[:, :c], cross, x[:, c + 1 :]], dim=1)

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        s = state.scratch.get(SCRATCH)
        if s is None:
            return None
        n = state.num_tokens
        device = s["device"]
        hide = torch.zeros(n, dtype=dtype, device=device)
        hide[s["index"]] = float("-inf")  # no token attends to the cross token: it only reads
        bias = hide[None, None, None, :]
        size = state.size
        if self.config.prop_attn and size is not None:
            bias = bias + size[..., 0].to(dtype).log()[:, None, None, :]  # log in the model's dtype
        return bias

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        asked = self.r_per_block[info.index]
        if asked <= 0:
            return x
        s = state.scratch[SCRATCH]
        n, b = x.shape[1], x.shape[0]
        protected, groups = self._protected(state, x)
        if self.modality == "image":
            r = min(asked, max_graph_merge(n, state.num_prefix))
            row = torch.full((b,), s["index"], dtype=torch.long, device=x.device)
        else:
            refuse_causal_decoder(state, "CrossGET")
            n_prot = int(protected.sum(dim=1).max())
            r = min(asked, max_graph_merge(n, n_prot), int(feasible_sources(protected, groups).min()))
            row = eot_rows(state)
        if r <= 0:
            return x
        q, keys = self._metric(info.q), self._metric(info.keys)  # [B, N, C]
        query = q.gather(1, row[:, None, None].expand(-1, 1, q.shape[-1]))
        importance = self._importance(keys, query).detach()  # [B, N], no grad as in the reference
        plan = complete_graph_matching(
            keys,
            importance,
            r,
            state.num_prefix,
            protected=None if protected is None or self.modality == "image" else protected,
            groups=groups,
        )
        if self.config.ensemble == "reference":
            x, size = plan.merge_ensemble(x, state.sizes(x), importance)
        else:
            x, size = plan.merge_weighted(x, state.sizes(x), ensemble_weights(importance))
        state.merge(plan, merged_size=size)
        return x

    def _metric(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, Dh]`` → ``[B, N, C]``: heads concatenated (``H·Dh``, the attention's
        full-width projection, as the reference reads it) or averaged (``Dh``)."""
        if self.config.metric == "head_mean":
            return t.mean(dim=1)
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    @staticmethod
    def _importance(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Cosine of each key with the guiding query, as ``k̂ · q̂`` (the reference's form)."""
        k = F.normalize(keys.to(torch.promote_types(keys.dtype, torch.float32)), dim=-1)
        qn = F.normalize(query.to(k.dtype), dim=-1)
        return (k @ qn.transpose(-1, -2))[..., 0]

    def _protected(self, state: TokenState, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Text towers: prefix, the layout's protected token (EOT / [CLS]) and the first input
        token (SOT); padding as its own group. Image towers: the prefix only (no mask)."""
        if self.modality == "image":
            return None, None
        b, n = x.shape[:2]
        prot = torch.zeros(b, n, dtype=torch.bool, device=x.device)
        prot[:, : state.num_prefix] = True
        prot = prot | state.get(PROTECTED).bool() | (state.get(POSITION) == 0)
        pad = state.get(PAD)
        return prot, None if pad is None else pad.long()

    def finish(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        s = state.scratch[SCRATCH]
        c, n = s["index"], x.shape[1]
        keep = torch.cat([torch.arange(c, device=x.device), torch.arange(c + 1, n, device=x.device)])
        x = state.select(x, keep[None].expand(x.shape[0], -1))
        state.num_prefix -= 1
        if s["record"] and s["inputs"]:
            self._align(torch.stack(s["inputs"], dim=1), state, x, s["pairing"])
        s["inputs"] = []
        return x

    def _align(self, inputs: torch.Tensor, state: TokenState, output: torch.Tensor, pairing: Pairing) -> None:
        """Pair this forward's projected cross tokens with the other tower's of the same step, or
        leave them for it. A value left by a forward that a backward pass has since run through,
        or before an optimizer step changed the offsets, is not of this step and is dropped
        (:func:`vleff.backbones.pairs.hold`), so an unpaired forward never pairs with a later one.

        A replay (gradient checkpointing recomputing the last block) computes the same loss with
        the partner the forward paired with (``pairing``), into the replay's own state."""
        value = self.projector(inputs)
        ctx = pair_context(state)
        pending = ctx.data.setdefault(HOOK_NAME, {}) if ctx is not None else self.link.pending
        other = pair_or_hold(state, pending, pairing, self.modality, value, output, getattr(self.root, OFFSETS))
        if other is None:
            return
        image, text = (value, other) if self.modality == "image" else (other, value)
        state.add_aux_loss(LOSS_NAME, alignment_loss(image, text) * self.config.loss_weight)


# --- the towers of a pair -------------------------------------------------------------------------------
def resolve_pair(model: nn.Module) -> ModelPair:
    """The image-text pair in ``model`` (the model itself or one submodule, e.g. a LightningModule's).

    Raises:
        TypeError: no pair ("needs both towers"), or a pair without contrastive projections."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pair, found = None, pairs_in(model)  # the outermost pairs: a module holding two (teacher, student) is ambiguous
    if len(found) > 1:
        raise ValueError(
            f"{type(model).__name__} holds {len(found)} image-text models ({', '.join(n for n, _ in found)}); "
            "apply CrossGET to one of them (the callback: CrossGET(module=...))"
        )
    if found:
        pair = found[0][1]
    if pair is None:
        try:
            have = "; ".join(t.describe() for t in find_towers(model))
        except TypeError:
            have = "no supported tower"
        raise TypeError(
            f"CrossGET does not support {type(model).__name__} ({have}): it needs both towers of an "
            f"image-text model (the image and text cross tokens are aligned in training); supported: "
            f"open_clip CLIP, transformers CLIPModel, BlipForImageTextRetrieval"
        )
    if not pair.has_contrastive_projections:
        raise TypeError(
            f"CrossGET does not support {type(pair.model).__name__}: it needs both towers with their "
            "contrastive projections (BLIP: BlipForImageTextRetrieval); BLIP captioning and VQA "
            "models have none"
        )
    return pair


def projector(pair: ModelPair, modality: str) -> Projector:
    """How ``modality``'s cross tokens are projected for the loss, per pair family. Image towers
    use their input norm (the reference's ``VisionTransformer.forward`` projects with ``ln_pre``),
    text towers their final norm; both with the tower's projection."""
    return Projector(*pair.cross_token_norm_and_projection(modality))  # the pair adapter knows its family


def input_tokens(tower: TowerAdapter) -> int | None:
    """Tokens entering the tower's first block at most (position-embedding rows), or ``None``."""
    root = tower.root
    for holder, attr in ((root, "positional_embedding"), (getattr(root, "embeddings", None), "position_embedding")):
        table = getattr(holder, attr, None) if holder is not None else None
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings)
        if isinstance(table, torch.Tensor):
            return int(table.shape[-2])
    return None


def max_r(tower: TowerAdapter) -> int | None:
    """The most tokens a block of ``tower`` can merge (its first block, the cross token
    included), or ``None`` when the tower's input length is not known ahead."""
    n0 = input_tokens(tower)
    if n0 is None:
        return None
    protected = tower.num_prefix_tokens + 1 if tower.modality == "image" else (2 if tower.num_prefix_tokens else 3)
    return max_graph_merge(n0 + 1, protected)


def _budget_towers(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(setting, depth, most merges per block)`` of the pair's two towers."""
    pair = resolve_pair(model)
    out = []
    for name, tower in (("r_image", pair.image_tower), ("r_text", pair.text_tower)):
        out.append((name, len(tower.blocks()), max_r(tower) or 1))
    return out


def budget_levels(model: nn.Module) -> int:
    """CrossGET's FLOPs knob (:func:`vleff.fit_budget`): merges over a whole tower, levels ``0..``
    the larger tower's most (every block merging all it can)."""
    return max(depth * cap for _, depth, cap in _budget_towers(model))


def budget_settings(model: nn.Module, level: float) -> dict[str, list[int]]:
    """Both towers' per-block ``r`` at ``level``: each tower its share of its own most merges (so
    the two reduce in proportion), spread over its blocks front-loaded (one merge per step: fine
    steps; the hook caps a block at what it can merge)."""
    top, out = budget_levels(model), {}
    for name, depth, cap in _budget_towers(model):
        out[name] = spread_merges(round(int(level) * depth * cap / top), depth)
    return out


def _check_r(tower: TowerAdapter, spec: int | list[int]) -> None:
    name = "r_image" if tower.modality == "image" else "r_text"
    depth = len(tower.blocks())
    if isinstance(spec, list) and len(spec) > depth:
        raise ValueError(
            f"{name} has {len(spec)} entries but the {tower.modality} tower has {depth} blocks ({tower.describe()})"
        )
    r = max(spec, default=0) if isinstance(spec, list) else spec
    n0 = input_tokens(tower)
    if n0 is None:
        return
    if tower.modality == "image":
        protected, what = tower.num_prefix_tokens + 1, "cls and the cross token"
    else:
        protected = 2 if tower.num_prefix_tokens else 3
        what = "[CLS] and the cross token" if tower.num_prefix_tokens else "SOT, EOT and the cross token"
    cap = max_graph_merge(n0 + 1, protected)
    if r > cap:
        raise ValueError(
            f"{name}={r} is larger than the {tower.modality} tower can merge: its first block has "
            f"{n0 + 1} tokens with the cross token ({what} protected), so at most {cap} per block "
            f"({tower.describe()})"
        )


def apply_crossget(model: nn.Module, config: CrossGETConfig | None = None, **settings: Any) -> nn.Module:
    """CrossGET on both towers of the image-text model in ``model`` (in place).

    Adds a ``vleff_crossget_offsets`` parameter (``zeros(L, D)``) to each tower; applying again
    replaces the settings and keeps the trained offsets.

    Raises:
        TypeError: ``model`` holds no supported pair (a single tower, BLIP captioning/VQA).
        ValueError: a bad setting; ``r`` larger than a tower can merge; another token method
            applied to a tower of the pair.
    """
    cfg = CrossGETConfig.build(config, **settings)
    pair = resolve_pair(model)
    towers = [pair.image_tower, pair.text_tower]
    link = PendingCrossTokens()
    hooks = [CrossGETHook(t, cfg, projector(pair, t.modality), link) for t in towers]
    for tower, hook in zip(towers, hooks):  # before anything is registered: a refusal changes nothing
        check_attachable(tower, hook)
    _check_r(pair.image_tower, cfg.r_image)
    _check_r(pair.text_tower, cfg.r_text)
    if crossget_applied(model):
        update_crossget(model, **cfg.as_dict())
        return model
    for tower in towers:
        ref = next(tower.root.parameters())
        offsets = nn.Parameter(torch.zeros(len(tower.blocks()), tower.embed_dim, device=ref.device, dtype=ref.dtype))
        tower.root.register_parameter(OFFSETS, offsets)
    attach_hooks(towers, hooks)
    return model


def remove_crossget(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_crossget`: no hooks, no offsets, the library's own forward."""
    if not crossget_applied(model):
        raise ValueError(f"CrossGET is not applied to this {type(model).__name__}; nothing to remove")
    for tower in find_towers(model):
        patch = get_patch(tower.root)
        if patch is not None and patch.get_hook(HOOK_NAME) is not None and OFFSETS in tower.root._parameters:
            del tower.root._parameters[OFFSETS]
    remove_hooks(model, HOOK_NAME)
    return model


def update_crossget(model: nn.Module, **changes: Any) -> None:
    """Change ``r_image`` / ``r_text`` / ``prop_attn`` / ``loss_weight`` of an applied CrossGET."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"CrossGET is not applied to this {type(model).__name__}; call apply_crossget first")
    new = hooks[0].config.replace(**changes)
    pair = resolve_pair(model)
    _check_r(pair.image_tower, new.r_image)
    _check_r(pair.text_tower, new.r_text)
    for hook in hooks:
        hook.configure(new)


def crossget_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def crossget_offsets(model: nn.Module) -> dict[str, nn.Parameter]:
    """The cross-token offsets of each tower, by modality."""
    out = {}
    for tower in find_towers(model):
        p = tower.root._parameters.get(OFFSETS)
        if p is not None:
            out[tower.modality] = p
    return out


__all__ = [
    "ENSEMBLES",
    "LOSS_NAME",
    "METRICS",
    "OFFSETS",
    "PAIRS_SUPPORTED",
    "CrossGETConfig",
    "CrossGETHook",
    "alignment_loss",
    "apply_crossget",
    "crossget_applied",
    "crossget_offsets",
    "js_divergence",
    "layer_pairs",
    "remove_crossget",
    "resolve_pair",
    "update_crossget",
]
