from lap.cli import main

main()
