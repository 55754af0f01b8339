"""var_mclr/train.py with accelerate's FSDP admitted on CPU processes (tests/accelerate_fsdp_on_cpu.py), for
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_cpu_train.py --cfg ...`
in tests/test_fsdp_train.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import accelerate_fsdp_on_cpu  # noqa: E402,F401  (patches accelerate before train.py builds its Accelerator)
from gloo_exit import run_and_exit  # noqa: E402
from var_mclr.train import main  # noqa: E402

if __name__ == "__main__":
    run_and_exit(main)  # tests/gloo_exit.py: gloo can abort the interpreter's finalization
