"""`python -m pyclipq.cli ...`, the form torchrun takes: torchrun --nproc-per-node N -m pyclipq.cli train ..."""
import sys

from . import main

sys.exit(main())
