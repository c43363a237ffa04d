from adaptery.cli.main import main

main()
