from vicunaflow.cli import main

main()
