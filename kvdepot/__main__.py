import sys

from kvdepot.cli import main

sys.exit(main())
