import sys

from bigr_engine.cli.main import main

sys.exit(main())
