"""``python -m gradzip``: the same as the ``gradzip`` command (and what ``torchrun -m gradzip train`` runs)."""

from gradzip.cli import main
from gradzip.train.launch import leave_without_teardown

if __name__ == "__main__":
    code = main()
    # Under torchrun this process was a worker: its result is written and its process group destroyed, and
    # gloo may still abort the interpreter's teardown. A user's mistake or a failure has returned its code.
    leave_without_teardown(code)
