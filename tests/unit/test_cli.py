from typer.testing import CliRunner

from mose.cli import app

runner = CliRunner()


def test_taxonomy_command_lists_levels_in_order():
    result = runner.invoke(app, ["taxonomy", "robot"])
    assert result.exit_code == 0
    out = result.output
    assert out.index("perception") < out.index("interpretation") < out.index("planning")


def test_unknown_taxonomy_is_a_clear_error():
    result = runner.invoke(app, ["taxonomy", "flying"])
    assert result.exit_code == 2
    assert "unknown taxonomy 'flying'" in result.output
