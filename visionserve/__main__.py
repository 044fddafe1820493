import sys

from visionserve.cli import main

sys.exit(main())
