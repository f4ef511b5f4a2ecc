"""`chatedit-edit` from a source checkout: chatedit/cli/edit.py."""

from chatedit.cli.edit import main

if __name__ == "__main__":
    main()
