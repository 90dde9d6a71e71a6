from ttvq_analysis.tables import main

main()
