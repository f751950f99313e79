import sys

from monovlm.cli import main

sys.exit(main())
