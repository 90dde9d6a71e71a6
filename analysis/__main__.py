import sys

from ttvq_analysis.cli import main

try:
    main()
except ValueError as e:  # bad filters, an empty selection, mixed protocols, conflicting records: one line
    print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
