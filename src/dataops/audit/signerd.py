"""`python -m dataops.audit.signerd`: run the checkpoint signer (see `dataops.audit.signer`)."""

import sys

from dataops.audit.signer import main

if __name__ == "__main__":
    sys.exit(main())
