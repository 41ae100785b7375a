"""Make rewrite/data/sentences.txt: a seeded sample of sentences from standard-library docstrings."""
import importlib
import inspect
import random
import re
import warnings

warnings.simplefilter("ignore")
mods = ["os", "json", "re", "collections", "itertools", "functools", "pathlib", "string", "textwrap", "random",
        "datetime", "calendar", "csv", "heapq", "bisect", "statistics", "fractions", "decimal", "shutil",
        "tempfile", "argparse", "logging", "email", "http.client", "urllib.parse", "zipfile", "tarfile",
        "sqlite3", "threading", "queue", "subprocess", "socket", "selectors", "asyncio", "contextlib",
        "dataclasses", "enum", "typing", "inspect", "ast", "dis", "pickle", "copy", "pprint", "difflib",
        "unicodedata", "codecs", "io", "time", "math", "operator", "weakref", "gc", "abc", "numbers", "uuid",
        "hashlib", "hmac", "secrets", "base64", "binascii", "struct", "array", "glob", "fnmatch", "gzip", "bz2",
        "lzma", "configparser", "platform", "locale", "gettext", "unittest", "doctest", "timeit", "trace",
        "traceback", "warnings", "smtplib", "mimetypes", "html.parser", "xml.dom.minidom", "wave", "colorsys"]
seen, out = set(), []
for name in mods:
    try:
        m = importlib.import_module(name)
    except Exception:
        continue
    objs = [m] + [getattr(m, a) for a in dir(m) if not a.startswith("_")]
    for o in objs:
        try:
            doc = inspect.getdoc(o)
        except Exception:
            doc = None
        if not doc:
            continue
        text = " ".join(doc.split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            if 40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and ">>>" not in s and s not in seen:
                if sum(c.isalpha() or c == " " for c in s) / len(s) > 0.9:
                    seen.add(s); out.append(s)
random.Random(1234).shuffle(out)
print("\n".join(out[:600]))
