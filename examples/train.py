"""Train a memory adapter (or any of the paper's fine-tune settings) with accelerate.

    accelerate launch examples/train.py --setting memory --m 5          # GPU(s), CPU, mixed precision via accelerate
    python examples/train.py --setting head --max_steps 100              # the same, single process

The training loop lives in ``memory_peft.training`` (also the ``memory-peft train`` command); see ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_peft.training import checkpoint_dirs, evaluate_model, main  # noqa: E402,F401  (re-exported for users)

if __name__ == "__main__":
    main()
