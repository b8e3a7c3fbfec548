from chatgate.cli import main

main()
