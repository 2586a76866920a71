"""Split a .sql file into statements: asyncpg runs one statement per call."""

from pathlib import Path


def split_statements(text: str) -> list[str]:
    """Split on `;` outside dollar-quoted bodies. Whole-line `--` comments are dropped first."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    statements: list[str] = []
    current: list[str] = []
    in_dollar_quote = False
    source = "\n".join(lines)
    i = 0
    while i < len(source):
        if source.startswith("$$", i):
            in_dollar_quote = not in_dollar_quote
            current.append("$$")
            i += 2
            continue
        char = source[i]
        if char == ";" and not in_dollar_quote:
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
        else:
            current.append(char)
        i += 1
    assert not in_dollar_quote, "unterminated $$ body"
    assert not "".join(current).strip(), "statement without a closing ;"
    return statements


def read_statements(path: Path) -> list[str]:
    return split_statements(path.read_text(encoding="utf-8"))
