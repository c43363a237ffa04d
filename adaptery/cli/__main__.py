from adaptery.cli.main import app

app()
