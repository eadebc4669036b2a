import sys

from atom_server.cli import main

sys.exit(main())
