# ramba_cc_library(NAME name SRCS ... [HDRS ...] [DEPS ...] [PRIVATE_DEPS ...])
# One component folder = one library target (Abseil's absl_cc_library, trimmed).
function(ramba_cc_library)
  cmake_parse_arguments(R "" "NAME" "SRCS;HDRS;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${R_NAME} ${R_SRCS} ${R_HDRS})
  target_include_directories(${R_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${R_NAME} PUBLIC ${R_DEPS} PRIVATE ${R_PRIVATE_DEPS})
  target_compile_options(${R_NAME} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
endfunction()

# ramba_cc_test(NAME name SRCS ... [DEPS ...] [LABELS ...])
# One gtest binary per test file, registered with ctest (LevelDB's leveldb_test()).
function(ramba_cc_test)
  cmake_parse_arguments(R "" "NAME" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${R_NAME} ${R_SRCS})
  target_link_libraries(${R_NAME} PRIVATE ${R_DEPS} GTest::gtest GTest::gtest_main)
  target_compile_definitions(${R_NAME} PRIVATE
    RAMBA_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_test(NAME ${R_NAME} COMMAND ${R_NAME})
  set_tests_properties(${R_NAME} PROPERTIES
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} TIMEOUT 900
    ENVIRONMENT "OMP_NUM_THREADS=1")  # ctest runs tests in parallel: no oversubscription
  if(R_LABELS)
    set_tests_properties(${R_NAME} PROPERTIES LABELS "${R_LABELS}")
  endif()
endfunction()
