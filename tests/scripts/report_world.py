"""Print the distributed world an hf_mae run sees: `rank world backend` (launched by tests/test_accelerate_configs.py)."""

import tempfile

from hf_mae.training import MAEPretrainingArguments

args = MAEPretrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none")
print("WORLD", args.process_index, args.world_size, args.distributed_state.backend, flush=True)
