import sys

from modeling_saisa.cli import main

sys.exit(main())
