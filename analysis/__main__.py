import sys

from ttvq_analysis.tables import main

try:
    main()
except ValueError as e:  # an empty selection, mixed protocols, conflicting records: said, not a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
