"""Tuning beside a frozen backbone (methods only, no Lightning): small trained modules that
read a frozen tower without ever back-propagating through its token stream.

* :mod:`vleff.side.vqt`: Visual Query Tuning (per-layer query tokens that read each block's
  frozen keys/values and are collected into the head).
* :mod:`vleff.side.lst`: Ladder Side-Tuning (a width-reduced side network fed by gated ladders
  from every block's output, initialised from the backbone by channel importance).
* :mod:`vleff.side.unipt`: UniPT (parallel interaction and confidence aggregation over every
  layer's output, anchored at the frozen final feature).
* :mod:`vleff.side.memvp`: MemVP (visual features as extra key/value rows of a language model's
  FFNs, on BLIP and :class:`vleff.models.VisionLanguageModel` hosts).
* :mod:`vleff.side.common`: what they share (layer reader, final-feature insertion, freezing,
  the unfrozen-backbone refusal, side-only state dicts).
* :mod:`vleff.side.lora`: LoRA through Hugging Face ``peft``, the baseline to compare with.
"""
from __future__ import annotations

from vleff.side.common import (backbone_eval, freeze_backbone, load_side_state_dict, refuse_unfrozen_backbone,
                               side_state_dict, unfrozen_backbone_parameters)
from vleff.side.lst import LSTConfig, apply_lst, fisher_information, lst_applied, remove_lst
from vleff.side.memvp import MemVPConfig, apply_memvp, memvp_applied, remove_memvp, set_memvp_memory
from vleff.side.unipt import UniPTConfig, apply_unipt, remove_unipt, unipt_applied
from vleff.side.vqt import VQTConfig, apply_vqt, freeze_backbone_for_vqt, remove_vqt, vqt_applied, vqt_parameters

__all__ = ["LSTConfig", "MemVPConfig", "UniPTConfig", "VQTConfig", "apply_lst", "apply_memvp", "apply_unipt",
           "apply_vqt", "backbone_eval", "fisher_information", "freeze_backbone", "freeze_backbone_for_vqt",
           "load_side_state_dict", "lst_applied", "memvp_applied", "refuse_unfrozen_backbone", "remove_lst",
           "remove_memvp", "remove_unipt", "remove_vqt", "set_memvp_memory", "side_state_dict",
           "unfrozen_backbone_parameters", "unipt_applied", "vqt_applied", "vqt_parameters"]
