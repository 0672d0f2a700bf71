"""Writes notebooks/tome_digits.ipynb (kept as a script so the notebook's source is reviewable)."""
import nbformat as nbf

md = nbf.v4.new_markdown_cell
code = nbf.v4.new_code_cell
cells = [
    md("# Token merging (ToMe) on digits, end to end\n\n"
       "This notebook trains a small ViT on scikit-learn's bundled digits **with token merging** "
       "(one Lightning callback on an ordinary `Trainer`), then\n\n"
       "1. shows which patches ToMe merged, on a digit and on a real photograph;\n"
       "2. measures baseline against ToMe side by side: GFLOPs per image, images/s, "
       "activation memory and accuracy.\n\n"
       "Everything runs offline on a CPU in a few minutes. Set the environment variable "
       "`VLEFF_NOTEBOOK_EPOCHS` to train for fewer or more epochs (the test suite runs it with 1 epoch "
       "of a few steps, `VLEFF_NOTEBOOK_STEPS`, and one timing repeat, `VLEFF_NOTEBOOK_REPEATS`)."),
    code("import os\n"
         "import lightning.pytorch as pl\n"
         "import torch\n"
         "import matplotlib.pyplot as plt\n\n"
         "import vleff\n"
         "from vleff.callbacks import EfficiencyMonitor, TokenMerging\n"
         "from vleff.data import DigitsDataModule\n"
         "from vleff.models import ImageClassifier\n\n"
         "EPOCHS = int(os.environ.get('VLEFF_NOTEBOOK_EPOCHS', '20'))\n"
         "STEPS = int(os.environ.get('VLEFF_NOTEBOOK_STEPS', '0')) or None  # None: every training batch\n"
         "REPEATS = int(os.environ.get('VLEFF_NOTEBOOK_REPEATS', '5'))  # interleaved timings per method\n"
         "R = 4  # tokens merged per block: 65 -> 45 tokens over the 6 blocks\n"
         "pl.seed_everything(0)\n"
         "torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', min(2, os.cpu_count() or 1))))"),
    md("## Train with ToMe\n\n"
       "`TokenMerging` patches the model in `setup`; `EfficiencyMonitor` logs GFLOPs per sample and "
       "the tokens entering each block. `training_step` is the classifier's own, unchanged."),
    code("data = DigitsDataModule(image_size=32, batch_size=32)\n"
         "module = ImageClassifier('vit_tiny_digits', num_classes=10, image_size=32, lr=2e-3)\n"
         "trainer = pl.Trainer(max_epochs=EPOCHS, limit_train_batches=STEPS, accelerator='cpu', devices=1,\n"
         "                     logger=False, enable_checkpointing=False,\n"
         "                     callbacks=[TokenMerging(r=R), EfficiencyMonitor()])\n"
         "trainer.fit(module, datamodule=data)\n"
         "print('validation accuracy with ToMe:', float(trainer.callback_metrics['val/acc']))\n"
         "print('tokens entering each block:', vleff.token_counts(module.model))"),
    md("## Which patches were merged?\n\n"
       "With `trace_source=True` ToMe keeps a source map: which input patches each remaining token "
       "holds. Each group below is painted in its mean colour, with dark borders between groups. "
       "First on validation digits, with the model just trained (a copy, so the trained model "
       "stays as it is):"),
    code("import copy\n"
         "from vleff.methods.tome.visualize import merge_groups, render_groups\n\n"
         "data.setup('validate')\n"
         "images, labels = next(iter(data.val_dataloader()))\n"
         "viewer = copy.deepcopy(module.model).eval()\n"
         "vleff.remove_tome(viewer)\n"
         "vleff.apply_tome(viewer, r=R, trace_source=True)\n"
         "fig, axes = plt.subplots(2, 6, figsize=(12, 4.4))\n"
         "for i in range(6):\n"
         "    picture = (images[i] + 1) / 2            # the data module scales pixels to [-1, 1]\n"
         "    group_ids, n_groups = merge_groups(viewer, images[i])\n"
         "    axes[0, i].imshow(picture.permute(1, 2, 0)); axes[0, i].set_title(f'label {int(labels[i])}')\n"
         "    axes[1, i].imshow(render_groups(picture, group_ids)); axes[1, i].set_title(f'{n_groups} tokens')\n"
         "for ax in axes.flat:\n"
         "    ax.axis('off')\n"
         "fig.tight_layout()"),
    md("And on a real photograph that ships with scikit-learn, with a ViT-S/16 at 224 px ("
       "196 patches). The weights here are random (nothing is downloaded); pass "
       "`pretrained=True` to `vleff.models.build_model` on a machine with network access to see "
       "the groups of a trained model. Even at random init the first blocks' keys follow pixel "
       "content, so sky merges with sky:"),
    code("from vleff.models import build_model\n"
         "from vleff.methods.tome.visualize import plot_merge_groups, sample_photo\n\n"
         "vit_s = build_model('vit_small', num_classes=10, image_size=224).eval()\n"
         "plot_merge_groups(vit_s, sample_photo('china.jpg'), r_values=(8, 16));"),
    md("## Baseline vs ToMe: FLOPs, speed, memory, accuracy\n\n"
       "`compare_methods` copies the trained model three ways — its weights without merging "
       "(baseline), the model as trained (ToMe r=4), and the same weights with a stronger r=6 "
       "applied off the shelf — and measures them in one process: FLOPs counted with "
       "`FlopCounterMode`, images/s timed interleaved after warm-up (median of repeats), "
       "activation memory as bytes saved for backward, and validation accuracy."),
    code("from vleff.cli.evaluate import compare_methods\n"
         "from vleff.profile import plot_rows, print_table\n\n"
         "batches = list(data.val_dataloader())\n"
         "rows = compare_methods(module.model, batches, {'tome': {'r': 6}}, batch_size=64, repeats=REPEATS)\n"
         "print_table(rows, title='digits ViT: baseline vs ToMe (CPU, fp32, batch 64)')\n"
         "for row in rows:\n"
         "    print(f\"{row['name']:<34} FLOPs x{row['flops_ratio']:.3f}  accuracy {100 * row['accuracy']:.1f}%\")"),
    code("plot_rows(rows, 'tome_digits_results.png', title='digits ViT: baseline vs ToMe')\n"
         "from IPython.display import Image\n"
         "Image('tome_digits_results.png')"),
    md("### Reading the table\n\n"
       "* **FLOPs ratio** is exact and does not depend on the machine.\n"
       "* **img/s** on a 2-core CPU with a 128-wide model is dominated by per-op overhead; the "
       "ratios that matter are in the README's method table (ViT-S/B at 224 px) and in "
       "`docs/benchmarks.md`.\n"
       "* To reproduce at scale: `vleff-train experiment=vit_tome` (training with ToMe) or "
       "`vleff-bench model=vit_base methods=[tome] image_size=224`."),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"}})
nbf.write(nb, "notebooks/tome_digits.ipynb")
