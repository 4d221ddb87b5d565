"""The subcommands of `lightune`. options.py holds the train configuration's flags, which are not a command."""
