import sys

from .cli import main

if __name__ == "__main__":  # a spawned ledger writer imports this module too, and must not run the CLI
    sys.exit(main())
