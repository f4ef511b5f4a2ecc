"""`chatedit-frontier` from a source checkout: chatedit/cli/frontier.py."""

from chatedit.cli.frontier import main

if __name__ == "__main__":
    main()
