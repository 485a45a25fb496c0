import sys

from fasttrain.sweep.cli import main

sys.exit(main())
