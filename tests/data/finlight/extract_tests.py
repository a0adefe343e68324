#!/usr/bin/env python3
"""Extract labelled bank SMS from the unit tests of PrajwalMadhyastha/Finlight-Android
(Apache-2.0) into JSONL, reading the fetched git mirror with `git show` (no work tree).

Each output line:
  {"id", "text", "sender",
   "expected": {"amount": str|None, "direction": "debit"|"credit"|None,
                "account": str|None, "account_type": str|None, "balance": None,
                "merchant": str|None, "currency": str|None},
   "labelled": [fields the source test actually asserts],
   "kind": "transaction" | "ignored",
   "rules": "default" | "custom",       # custom = test installs its own ignore/custom/rename rules
   "source": {"repo", "commit", "path", "test"}}

direction None + kind "ignored" means the Finlight test asserts the parser returns null
(Finlight treats the message as not-a-transaction under its default ignore policy, or under
the test's own rules when rules == "custom"). Finlight tests never assert a balance, so
"balance" is always None and never listed in "labelled".

Usage: extract_dataset.py [MIRROR_GIT_DIR] [OUT_JSONL] [--commit REV]
"""
import json
import re
import subprocess
import sys

REPO = "PrajwalMadhyastha/Finlight-Android"
TEST_DIR = "app/src/test/java/io/pm/finlight/core/parser"
SKIP_FILES = {"BaseSmsParserTest.kt", "ComprehensiveIgnoreRuleParserTest.kt"}  # helper / synthetic


def git(gitdir, *args):
    return subprocess.check_output(["git", "--git-dir", gitdir, *args], text=True)


# ---------- Kotlin string literal parsing ----------
ESC = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", '"': '"', "'": "'", "\\": "\\", "$": "$"}


def parse_quoted(s, i):
    """s[i] == '"' (not triple). Returns (value, next_index) or raises on templates."""
    assert s[i] == '"'
    i += 1
    out = []
    while True:
        c = s[i]
        if c == "\\":
            n = s[i + 1]
            if n == "u":
                out.append(chr(int(s[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(ESC[n])
            i += 2
            continue
        if c == "$" and (s[i + 1] == "{" or s[i + 1].isalpha() or s[i + 1] == "_"):
            raise ValueError("string template")
        if c == '"':
            return "".join(out), i + 1
        if c == "\n":
            raise ValueError("newline in string")
        out.append(c)
        i += 1


def trim_indent(text):
    lines = text.split("\n")
    if lines and not lines[0].strip():
        lines = lines[1:]
    if lines and not lines[-1].strip():
        lines = lines[:-1]
    indents = [len(l) - len(l.lstrip()) for l in lines if l.strip()]
    m = min(indents) if indents else 0
    return "\n".join(l[m:] if l.strip() else "" for l in lines)


def parse_expr(s, i):
    """Parse `lit (+ lit)*` with optional .trimIndent() after raw strings."""
    parts = []
    while True:
        while s[i].isspace():
            i += 1
        if s.startswith('"""', i):
            j = s.index('"""', i + 3)
            raw = s[i + 3:j]
            if re.search(r"\$[{A-Za-z_]", raw):
                raise ValueError("template in raw string")
            i = j + 3
            if s.startswith(".trimIndent()", i):
                raw = trim_indent(raw)
                i += len(".trimIndent()")
            parts.append(raw)
        elif s[i] == '"':
            v, i = parse_quoted(s, i)
            parts.append(v)
        else:
            raise ValueError("not a literal: %r" % s[i:i + 30])
        k = i
        while k < len(s) and s[k] in " \t\r\n":
            k += 1
        if k < len(s) and s[k] == "+":
            i = k + 1
            continue
        return "".join(parts), i


def literal_after(pattern, body):
    m = re.search(pattern, body)
    if not m:
        return None
    try:
        return parse_expr(body, m.end())[0]
    except ValueError:
        return None


NUM = r"(-?\d+(?:\.\d+)?)"


def extract_test(name, body):
    text = literal_after(r"val\s+smsBody\s*=\s*", body)
    if text is None:
        return None, "no literal smsBody"
    sender = literal_after(r"\bsender\s*=\s*", body)
    if sender is None:
        m = re.search(r"SmsMessage\(\s*\d+L?\s*,\s*", body)
        if m:
            try:
                sender = parse_expr(body, m.end())[0]
            except ValueError:
                sender = None
    setup = re.search(r"setupTest\(([^)]*(?:\([^)]*\)[^)]*)*)\)", body)
    setup_args = setup.group(1) if setup else ""
    custom = bool(re.search(r"customRules\s*=|renameRules\s*=", setup_args)) or bool(
        re.search(r"ignoreRules\s*=\s*(?!DEFAULT_IGNORE_PHRASES\b)", setup_args))
    exp = {"amount": None, "direction": None, "account": None, "account_type": None,
           "balance": None, "merchant": None, "currency": None}
    labelled = []
    R = r"(?:result\?|transaction)"
    m = re.search(r"assertEquals\(\s*(?:\"[^\"]*\"\s*,\s*)?" + NUM + r"\s*,\s*" + R + r"\.amount", body)
    if m:
        exp["amount"] = m.group(1)
        labelled.append("amount")
    m = re.search(r"assertEquals\(\s*\"(expense|income)\"\s*,\s*" + R + r"\.transactionType", body)
    if m:
        exp["direction"] = {"expense": "debit", "income": "credit"}[m.group(1)]
        labelled.append("direction")

    def str_assert(field):
        mm = re.search(r"assertEquals\(\s*(?:\"[^\"]*\"\s*,\s*)?(\"(?:[^\"\\]|\\.)*\"|null)\s*,\s*"
                       + R + r"\." + field + r"\b", body)
        if not mm:
            return False, None
        if mm.group(1) == "null":
            return True, None
        return True, parse_quoted(mm.group(1), 0)[0]

    ok, v = str_assert(r"potentialAccount\?\.formattedName")
    if ok:
        exp["account"] = v
        labelled.append("account")
    elif re.search(r"assertEquals\(\s*null\s*,\s*result\?\.potentialAccount\s*\)", body):
        labelled.append("account")
    ok, v = str_assert(r"potentialAccount\?\.accountType")
    if ok:
        exp["account_type"] = v
        labelled.append("account_type")
    ok, v = str_assert("merchantName")
    if ok:
        exp["merchant"] = v
        labelled.append("merchant")
    elif re.search(r"assertNull\([^)]*result\?\.merchantName\)", body):
        labelled.append("merchant")
    ok, v = str_assert("detectedCurrencyCode")
    if ok:
        exp["currency"] = v
        labelled.append("currency")

    is_null = bool(re.search(r"assertNull\((?:\s*\"(?:[^\"\\]|\\.)*\"\s*,)?\s*result\s*\)", body))
    if is_null:
        kind = "ignored"
        labelled = ["direction", "amount"]  # asserted: no transaction at all
    elif "amount" in labelled or "direction" in labelled:
        kind = "transaction"
    else:
        return None, "no amount/direction/null assertion"
    return {"text": text, "sender": sender, "expected": exp, "labelled": labelled,
            "kind": kind, "rules": "custom" if custom else "default"}, None


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    rev = "HEAD"
    if "--commit" in argv:
        rev = argv[argv.index("--commit") + 1]
        args = [a for a in args if a != rev]
    gitdir = args[0] if args else "/work/.mirror/PrajwalMadhyastha+Finlight-Android/repo"
    out = args[1] if len(args) > 1 else "/tmp/research/second_set.jsonl"
    commit = git(gitdir, "rev-parse", rev).strip()
    paths = [p for p in git(gitdir, "ls-tree", "-r", "--name-only", commit, TEST_DIR).split()
             if p.endswith("Test.kt") and p.rsplit("/", 1)[-1] not in SKIP_FILES]
    rows, skipped = [], []
    for path in sorted(paths):
        src = git(gitdir, "show", f"{commit}:{path}")
        for m in re.finditer(r"@Test\s+fun\s+`([^`]+)`\s*\(\)", src):
            start = m.end()
            nxt = re.search(r"@Test\s+fun\s", src[start:])
            body = src[start:start + nxt.start()] if nxt else src[start:]
            row, why = extract_test(m.group(1), body)
            fname = path.rsplit("/", 1)[-1][:-3]
            if row is None:
                skipped.append((fname, m.group(1), why))
                continue
            row = {"id": f"{fname}/{m.group(1)}", **row,
                   "source": {"repo": REPO, "commit": commit, "path": path, "test": m.group(1)}}
            rows.append(row)
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"commit {commit}: wrote {len(rows)} lines to {out}; skipped {len(skipped)} tests",
          file=sys.stderr)
    for s in skipped:
        print("  skipped:", *s, file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
