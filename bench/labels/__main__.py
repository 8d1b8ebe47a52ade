import sys

from bench.labels.cli import main

sys.exit(main())
