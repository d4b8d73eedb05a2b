import sys

from egressd.deploy.entry import main

sys.exit(main())
