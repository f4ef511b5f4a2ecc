"""`chatedit-collect` from a source checkout: chatedit/cli/collect.py."""

from chatedit.cli.collect import main

if __name__ == "__main__":
    main()
