from lrsurgery.cli import main

main()
