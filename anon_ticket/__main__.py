import sys

from anon_ticket.cli import main

sys.exit(main())
