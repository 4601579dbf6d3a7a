"""Every command's --help reads as text: no printf escapes left over, the exit codes listed."""


def test_no_help_text_shows_a_doubled_percent_sign():
    from nasq.cli import build_parser
    from nasq.cli.exits import TABLE

    parser = build_parser()
    top = parser.format_help()
    assert all(f"  {code}  {text}" in top for code, text in TABLE)
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "%%" not in text, (name, [line for line in text.splitlines() if "%%" in line])
