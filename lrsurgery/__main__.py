from lrsurgery.cli import app

app()
