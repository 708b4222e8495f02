"""The main job on the built-in data (scikit-learn's digits, no download), minutes on 2 CPU cores:

1. pretrain a small MAE,
2. reload it through `AutoModel` (as any user of the Hub would),
3. fine-tune it for classification,
4. fine-tune the same architecture from scratch with the same budget,
5. print MAE vs scratch top-1 and write curves, reconstructions and model cards under --output_dir.

    make demo                       # = python examples/demo.py --output_dir demo_outputs
    python examples/demo.py --output_dir demo_outputs --pretrain_epochs 5 --finetune_epochs 2   # a smoke run
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModel

import hf_mae
from hf_mae.training import (
    DataArguments,
    MAEFinetuningArguments,
    MAEPretrainingArguments,
    ModelArguments,
    run_finetuning,
    run_pretraining,
)

logger = logging.getLogger("demo")

# The demo recipe: the MAE recipe's knobs, scaled to 1437 training images of 32 px.
PRESET = "demo-tiny-32"
# the demo regenerates its outputs on every run (overwrite_output_dir), so `make demo` can be run again
COMMON = dict(
    report_to="none",
    save_strategy="no",
    logging_strategy="epoch",
    eval_strategy="epoch",
    seed=0,
    overwrite_output_dir=True,
)
PRETRAIN = dict(per_device_train_batch_size=64, base_learning_rate=1.5e-3, weight_decay=0.05, **COMMON)
FINETUNE = dict(
    per_device_train_batch_size=64,
    base_learning_rate=1e-3,
    layer_decay=0.75,
    weight_decay=0.05,
    drop_path_rate=0.1,
    finetune_aug="small",
    **COMMON,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_outputs")
    parser.add_argument("--pretrain_epochs", type=int, default=60)
    parser.add_argument("--finetune_epochs", type=int, default=25)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    torch.manual_seed(0)
    out = Path(args.output_dir)
    start = time.time()
    data = DataArguments(dataset_name="digits", num_reconstructions=8)

    logger.info("1/4 pretraining an MAE (%s) on digits for %d epochs", PRESET, args.pretrain_epochs)
    warmup = max(1, args.pretrain_epochs // 10)
    pretrain_args = MAEPretrainingArguments(
        output_dir=str(out / "pretrain"), num_train_epochs=args.pretrain_epochs, warmup_epochs=warmup, **PRETRAIN
    )
    pretrain = run_pretraining(ModelArguments(preset=PRESET), data, pretrain_args)

    logger.info("2/4 reloading the pretrained encoder through AutoModel")
    encoder = AutoModel.from_pretrained(out / "pretrain")
    assert isinstance(encoder, hf_mae.MAEModel), type(encoder)

    results = {}
    for name, source in (("MAE fine-tuned", str(out / "pretrain")), ("from scratch", None)):
        step = "3/4" if source else "4/4"
        logger.info("%s fine-tuning %s for %d epochs", step, name, args.finetune_epochs)
        finetune_args = MAEFinetuningArguments(
            output_dir=str(out / ("finetune" if source else "scratch")),
            num_train_epochs=args.finetune_epochs,
            warmup_epochs=max(1, args.finetune_epochs // 10),
            **FINETUNE,
        )
        results[name] = run_finetuning(ModelArguments(model_name_or_path=source, preset=PRESET), data, finetune_args)

    minutes = (time.time() - start) / 60
    table = [
        "| model | top-1 (final) | top-1 (best) |",
        "|---|---|---|",
        *(f"| {name} | {r['top1']:.2f} | {r['best_top1']:.2f} |" for name, r in results.items()),
    ]
    summary = {
        "pretrain_eval_loss": pretrain.get("eval_loss"),
        "results": results,
        "minutes": round(minutes, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\nMAE pretraining eval loss {pretrain.get('eval_loss', float('nan')):.4f}; {minutes:.1f} min in all.")
    print(f"Curves, reconstructions and model cards: {out}/{{pretrain,finetune,scratch}}/")


if __name__ == "__main__":
    main()
