"""`python -m spice_stream_worker`: how the service starts the worker."""

import sys

from .main import main

sys.exit(main())
