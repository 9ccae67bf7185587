from polyfan.cli import main

main(prog_name="polyfan")
