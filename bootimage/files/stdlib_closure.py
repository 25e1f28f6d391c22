"""Run by the boot image's own Python: the stdlib files the agent imports, one a line.

It runs under the interpreter that goes into the image (not the farm's), so
the paths and the extension modules are that interpreter's. modulefinder
follows every import statement, also those inside functions and behind
conditions; the excluded packages are ones only optional code paths reach
(test helpers, terminals, asyncio) and the agent never uses.
"""

import json
import modulefinder
import sys

EXCLUDES = ["test", "unittest", "doctest", "pdb", "pydoc", "pydoc_data", "tkinter", "idlelib",
            "lib2to3", "distutils", "ensurepip", "_testcapi", "_testinternalcapi", "asyncio",
            "multiprocessing", "readline", "ctypes", "curses", "sqlite3", "xmlrpc", "turtle",
            "email.mime", "concurrent"]
# Imported by the interpreter itself at start-up or by codecs on demand, never by a statement.
STARTUP = ["encodings", "encodings.aliases", "encodings.utf_8", "encodings.ascii",
           "encodings.latin_1", "encodings.idna", "traceback", "linecache", "tokenize", "runpy"]


def main() -> None:
    agent_root, script = sys.argv[1], sys.argv[2]
    finder = modulefinder.ModuleFinder(path=[agent_root, *sys.path], excludes=EXCLUDES)
    for name in STARTUP:
        finder.import_hook(name)
    finder.run_script(script)
    found = (getattr(m, "__file__", None) for m in finder.modules.values())
    files = sorted({f for f in found if f and not f.startswith(agent_root)})
    json.dump({"files": files, "prefix": sys.prefix, "version": sys.version.split()[0],
               "magic": __import__("importlib.util").util.MAGIC_NUMBER.hex()}, sys.stdout)


if __name__ == "__main__":
    main()
