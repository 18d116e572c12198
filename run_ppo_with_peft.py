"""run_ppo_with_peft: not implemented yet (see the open issues)."""

import sys

if __name__ == "__main__":
    print("run_ppo_with_peft.py: not implemented yet", file=sys.stderr)
    sys.exit(2)
