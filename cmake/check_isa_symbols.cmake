# Fails the build when a per-ISA copy of the CPU kernels defines a symbol
# outside its own namespace (jax_mla::cpu::<ISA>::).
#
# kernels.cc is compiled once per ISA level with that level's target flags
# (CMakeLists.txt). Any external or weak symbol such a copy defines under a
# shared name (an inline function emitted out of line, a std:: template
# instantiated there) is merged by the linker with the same name from the other
# copies and from the rest of the module, and one definition wins for all of
# them: AVX-512 code run on a Zen 3, or a function called with another copy's
# vector type. Inside the copy's namespace every name is its own.
#
#   cmake -DNM=<nm> -DISA=<isa> -DOBJECTS=<object files> -P check_isa_symbols.cmake
foreach(var NM ISA OBJECTS)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_isa_symbols.cmake: ${var} is not set")
  endif()
endforeach()

string(LENGTH "${ISA}" isa_len)
# Itanium mangling of a name in jax_mla::cpu::<ISA>, with what may precede it:
# guard variables and typeinfo/vtables (_ZGV, _ZTI, ...), function-local
# statics (_ZZN), cv- and ref-qualified members (_ZNK...); a leading _ on Mach-O.
set(allowed "^_?_Z(GV|T[HISVW])?Z?N[rVKRO]*7jax_mla3cpu${isa_len}${ISA}")

foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" -g --defined-only "${object}"
                  OUTPUT_VARIABLE listing RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_isa_symbols.cmake: ${NM} failed on ${object}: ${err}")
  endif()
  string(REPLACE "\n" ";" lines "${listing}")
  set(stray)
  foreach(line IN LISTS lines)
    # "<address> <type> <name>"; the name is the last field.
    if(line MATCHES "^[0-9a-fA-F]* *[A-Za-z] +(.+)$")
      set(name "${CMAKE_MATCH_1}")
      if(NOT name MATCHES "${allowed}")
        list(APPEND stray "${name}")
      endif()
    endif()
  endforeach()
  if(stray)
    string(REPLACE ";" "\n  " stray "${stray}")
    message(FATAL_ERROR
      "The ${ISA} copy of the CPU kernels (${object}) defines symbols outside "
      "namespace jax_mla::cpu::${ISA}, which the linker would share with the other "
      "ISA copies (cmake/check_isa_symbols.cmake says why; `c++filt` demangles):\n  ${stray}\n"
      "Move them into the ISA namespace or give them internal linkage.")
  endif()
endforeach()
