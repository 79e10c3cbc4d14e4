import sys

from bayessparse.cli import main

sys.exit(main())
