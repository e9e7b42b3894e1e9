"""``python -m serving.server``: dcgan-serve."""

import sys

from serving.server.app import main

sys.exit(main())
