"""Write the distributed world an hf_mae run sees to OUT_DIR/rank<i>.txt as `rank world backend` (launched by
tests/test_accelerate_configs.py; one file per rank, since the ranks' stdout interleave)."""

import sys
import tempfile
from pathlib import Path

from hf_mae.training import MAEPretrainingArguments

args = MAEPretrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none")
line = f"{args.process_index} {args.world_size} {args.distributed_state.backend}"
(Path(sys.argv[1]) / f"rank{args.process_index}.txt").write_text(line)
