"""Results -> terminal tables (rich, on stderr), JSON, Markdown and HTML; imports no command.

table.py     what every terminal table shares (short names, fitting, literal cells)
inspect.py, repair.py, check.py, basis.py, eval.py   one command's rendering each
formats.py   the one dispatch from a `--report` file's extension to its format
"""
