"""`chatedit-align` from a source checkout: chatedit/cli/align.py."""

from chatedit.cli.align import main

if __name__ == "__main__":
    main()
