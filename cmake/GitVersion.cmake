# Records the git commit for `morphserve --version`.
execute_process(
  COMMAND git rev-parse --short=12 HEAD
  WORKING_DIRECTORY ${CMAKE_SOURCE_DIR}
  OUTPUT_VARIABLE MORPHSERVE_GIT_COMMIT
  OUTPUT_STRIP_TRAILING_WHITESPACE
  ERROR_QUIET)
if(NOT MORPHSERVE_GIT_COMMIT)
  set(MORPHSERVE_GIT_COMMIT "unknown")
endif()
