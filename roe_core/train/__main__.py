from .roe import main

main()
