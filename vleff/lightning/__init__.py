"""What every method's Lightning code shares, below the methods' ``lightning.py`` modules.

* :mod:`~vleff.lightning.targets`: which model a callback or mixin acts on (``module=``; several
  candidates refused, listing them), a method already applied with other settings refused, and
  removal at teardown that keeps the trained state;
* :mod:`~vleff.lightning.init_weights`: ``init_from`` (trained backbone weights loaded before the
  method is applied);
* :mod:`~vleff.lightning.restore`: the method record in checkpoints and ``restore_methods`` for
  ``load_from_checkpoint``;
* :mod:`~vleff.lightning.aux_loss`: a method's auxiliary loss added to the user's
  ``training_step`` loss without editing it (the ``AuxLoss`` callback base);
* :mod:`~vleff.lightning.mixin`: the mixins' one way to call the next hook (parent first) and
  ``vleff_aux_loss``;
* :mod:`~vleff.lightning.optimizer_swap`, :mod:`~vleff.lightning.schedulers`: optimizer conversion
  (GaLore) and stepping the user's schedulers (MeZO's manual optimisation);
* :mod:`~vleff.lightning.side`: the side-tuning base (LST, UniPT, VQT: freezing, side-only
  checkpoints).

This package imports no method; a method's core never imports this package or Lightning.
"""
